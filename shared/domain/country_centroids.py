"""Where a country is, roughly: ISO 3166-1 alpha-2 code -> (latitude, longitude) in degrees.

Used to place a learner who only says which country they are in (``"country": "FR"``), so
the nearest region can be chosen. The coordinates are approximate geographic centres
(centroids of each country's land area, rounded to about a tenth of a degree, from public
geographic references), not capitals or population centres: good enough to tell which of a
few regions, hundreds or thousands of kilometres apart, is nearest. Countries spread over
several continents or far-flung islands (US, FR, RU) are placed at the centre of their main
territory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

COUNTRY_CENTROIDS: Final[Mapping[str, tuple[float, float]]] = {
    # -- the European Union ----------------------------------------------------------------
    "AT": (47.6, 14.1),  # Austria
    "BE": (50.6, 4.7),  # Belgium
    "BG": (42.7, 25.5),  # Bulgaria
    "HR": (45.1, 15.2),  # Croatia
    "CY": (35.1, 33.4),  # Cyprus
    "CZ": (49.8, 15.5),  # Czechia
    "DK": (56.0, 10.0),  # Denmark
    "EE": (58.6, 25.0),  # Estonia
    "FI": (64.5, 26.0),  # Finland
    "FR": (46.6, 2.4),  # France (metropolitan)
    "DE": (51.2, 10.4),  # Germany
    "GR": (39.1, 22.0),  # Greece
    "HU": (47.2, 19.5),  # Hungary
    "IE": (53.2, -8.2),  # Ireland
    "IT": (42.8, 12.6),  # Italy
    "LV": (56.9, 24.6),  # Latvia
    "LT": (55.2, 23.9),  # Lithuania
    "LU": (49.8, 6.1),  # Luxembourg
    "MT": (35.9, 14.4),  # Malta
    "NL": (52.1, 5.3),  # Netherlands
    "PL": (52.1, 19.4),  # Poland
    "PT": (39.6, -8.0),  # Portugal (mainland)
    "RO": (45.9, 25.0),  # Romania
    "SK": (48.7, 19.7),  # Slovakia
    "SI": (46.1, 14.8),  # Slovenia
    "ES": (40.2, -3.6),  # Spain (mainland)
    "SE": (62.0, 15.0),  # Sweden
    # -- the rest of Europe --------------------------------------------------------------------
    "GB": (54.0, -2.5),  # United Kingdom
    "CH": (46.8, 8.2),  # Switzerland
    "NO": (64.5, 12.0),  # Norway (mainland)
    "IS": (64.9, -19.0),  # Iceland
    "LI": (47.2, 9.6),  # Liechtenstein
    "MC": (43.7, 7.4),  # Monaco
    "AD": (42.5, 1.6),  # Andorra
    "SM": (43.9, 12.5),  # San Marino
    "RS": (44.0, 21.0),  # Serbia
    "BA": (43.9, 17.7),  # Bosnia and Herzegovina
    "ME": (42.7, 19.4),  # Montenegro
    "MK": (41.6, 21.7),  # North Macedonia
    "AL": (41.2, 20.2),  # Albania
    "MD": (47.4, 28.4),  # Moldova
    "UA": (48.4, 31.2),  # Ukraine
    "BY": (53.7, 27.9),  # Belarus
    "RU": (61.5, 105.3),  # Russia
    "TR": (39.0, 35.2),  # Turkey
    "GE": (42.3, 43.4),  # Georgia
    "AM": (40.1, 45.0),  # Armenia
    "AZ": (40.1, 47.6),  # Azerbaijan
    # -- the Americas --------------------------------------------------------------------------
    "US": (39.8, -98.6),  # United States (contiguous)
    "CA": (56.1, -106.3),  # Canada
    "MX": (23.6, -102.6),  # Mexico
    "CU": (21.5, -77.8),  # Cuba
    "DO": (18.7, -70.2),  # Dominican Republic
    "PR": (18.2, -66.6),  # Puerto Rico
    "CR": (9.7, -83.8),  # Costa Rica
    "PA": (8.5, -80.8),  # Panama
    "CO": (4.6, -74.3),  # Colombia
    "VE": (6.4, -66.6),  # Venezuela
    "EC": (-1.8, -78.2),  # Ecuador
    "PE": (-9.2, -75.0),  # Peru
    "BR": (-14.2, -51.9),  # Brazil
    "CL": (-35.7, -71.5),  # Chile
    "AR": (-38.4, -63.6),  # Argentina
    "UY": (-32.5, -55.8),  # Uruguay
    # -- Africa and the Middle East -------------------------------------------------------------
    "MA": (31.8, -7.1),  # Morocco
    "DZ": (28.0, 1.7),  # Algeria
    "TN": (33.9, 9.5),  # Tunisia
    "EG": (26.8, 30.8),  # Egypt
    "NG": (9.1, 8.7),  # Nigeria
    "GH": (7.9, -1.0),  # Ghana
    "ET": (9.1, 40.5),  # Ethiopia
    "KE": (0.0, 37.9),  # Kenya
    "ZA": (-30.6, 22.9),  # South Africa
    "IL": (31.0, 34.9),  # Israel
    "JO": (30.6, 36.2),  # Jordan
    "LB": (33.9, 35.9),  # Lebanon
    "IQ": (33.2, 43.7),  # Iraq
    "IR": (32.4, 53.7),  # Iran
    "SA": (23.9, 45.1),  # Saudi Arabia
    "KW": (29.3, 47.5),  # Kuwait
    "QA": (25.4, 51.2),  # Qatar
    "AE": (23.4, 53.8),  # United Arab Emirates
    # -- Asia and Oceania ----------------------------------------------------------------------
    "KZ": (48.0, 66.9),  # Kazakhstan
    "PK": (30.4, 69.3),  # Pakistan
    "IN": (22.0, 79.0),  # India
    "NP": (28.4, 84.1),  # Nepal
    "BD": (23.7, 90.4),  # Bangladesh
    "LK": (7.9, 80.8),  # Sri Lanka
    "CN": (35.9, 104.2),  # China
    "HK": (22.3, 114.2),  # Hong Kong
    "TW": (23.7, 121.0),  # Taiwan
    "KR": (36.5, 127.9),  # South Korea
    "JP": (36.2, 138.3),  # Japan
    "TH": (15.9, 101.0),  # Thailand
    "VN": (14.1, 108.3),  # Vietnam
    "MY": (4.2, 101.9),  # Malaysia
    "SG": (1.35, 103.8),  # Singapore
    "ID": (-0.8, 113.9),  # Indonesia
    "PH": (12.9, 121.8),  # Philippines
    "AU": (-25.3, 133.8),  # Australia
    "NZ": (-41.5, 172.8),  # New Zealand
}
